"""The compute paths give the same answers on every device this machine has: the CPU always, CUDA when torch sees a
GPU (without one the CUDA cases do not exist, so CI runs the CPU half; `python -m pytest tests/test_devices.py` on a
GPU machine runs both).

Each test builds a tiny model on the CPU, copies it to the device, and compares the device's results with the CPU's
(and with the device's own other paths: the KV cache against the full forward, the engine's log-probs against
scoring). Only modules that import neither Ray nor FastAPI at module level are used, so this runs on a machine that
has torch, numpy, safetensors, tokenizers, onnxruntime, scikit-learn, matplotlib and pydantic but no serving stack.

Tolerances: float32 log-probs agree to 1e-4 (different kernels sum in different orders); float64 EM and mixture
scores to 1e-6 relative. cuDNN runs float32 convolutions in TF32 on Ampere and later by default, so the strict
image comparisons switch TF32 off (`full_fp32`) and one looser comparison checks the default math that serving runs.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.artifacts.artifact import load_artifact
from genserve.artifacts.tokenizer import train_char_tokenizer
from genserve.models.gmm import GaussianMixture
from genserve.models.gpt import GPT, GPTConfig
from genserve.models.image import ImageModel
from genserve.models.lm import score_token_lists, sequence_log_probs
from genserve.models.registry import IMAGE_MODELS, build_image_model
from genserve.service.decoding import Engine, GenerationParams, generate
from genserve.service.devices import make_generator
from genserve.service.image_runtime import TorchImageRuntime, load_image_model
from genserve.service.records_runtime import TorchRecordsRuntime
from genserve.service.text_runtime import load_text_model
from genserve.training.em import EMSettings, fit_gmm, initial_model, run_em
from genserve.training.image_data import load_digits
from genserve.training.image_pipeline import ImageTrainConfig, train_image
from genserve.training.text_pipeline import TextTrainConfig, train_text
from tests.tiny_lm import TEXT, fit_tiny_gpt

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F32 = dict(rtol=1e-4, atol=1e-4)  # float32 log-probs, device against CPU

pytestmark = pytest.mark.parametrize("device", DEVICES)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """Tiny models run fastest on one CPU thread (several contend, on a busy machine many times slower); the
    process's setting is restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """float32 matrix products and convolutions without TF32 (no effect on the CPU)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """A copy of a CPU module on `device` (the CPU original stays the reference)."""
    return copy.deepcopy(module).to(device).eval()


def device_of(module: torch.nn.Module) -> str:
    return next(iter([*module.parameters(), *module.buffers()])).device.type


# ---- 1. GPT: the KV cache against the full forward, the device against the CPU ------------------------------------

V = 37


def random_gpt(seed: int = 0) -> GPT:
    """A tiny GPT with weights well away from GPT-2's small init, so the next-token distributions are far from
    uniform and a cache or position slip shows in the log-probs."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, context_length=48, n_layer=2, n_head=4, n_embd=32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@torch.no_grad()
def test_gpt_cached_decoding_matches_the_full_sequence(device):
    """Prompts of different lengths, right-padded with junk, in scattered slots, then decoded one token at a time
    (rows at different positions, so masked steps; rows finishing early, so subsets of slots): every log-prob the
    cache gives equals the full forward's on the same device."""
    model = random_gpt().to(device)
    T = 20
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, T), generator=g)
    prompt_lengths = torch.tensor([4, 1, 9])
    full = sequence_log_probs(model, tokens.to(device)).cpu()  # (3, T-1): entry t-1 is log p(token t | < t)

    width = int(prompt_lengths.max())
    prompts = tokens[:, :width].clone()
    for i, n in enumerate(prompt_lengths.tolist()):
        prompts[i, n:] = (prompts[i, n:] + 1) % V  # padding that must not leak into the cache
    slots = torch.tensor([3, 0, 1])
    cache = model.allocate(slots=5, max_len=T)
    logits = model.prefill(cache, slots.to(device), prompts.to(device), prompt_lengths.to(device))
    cached = torch.full((3, T - 1), math.nan)
    pos = prompt_lengths.tolist()  # tokens each row has read
    rows = [0, 1, 2]
    while rows:
        log_probs = torch.log_softmax(logits.float(), -1).cpu()
        for k, i in enumerate(rows):
            cached[i, pos[i] - 1] = log_probs[k, tokens[i, pos[i]]]
        nxt = torch.tensor([int(tokens[i, pos[i]]) for i in rows])
        for i in rows:
            pos[i] += 1
        rows_before, rows = rows, [i for i in rows if pos[i] < T]
        if not rows:
            break
        keep = [k for k, i in enumerate(rows_before) if pos[i] < T]
        logits = model.decode(cache, slots[rows].to(device), nxt[keep].to(device))
    assert cache.lengths[slots.to(device)].tolist() == [T - 1, T - 1, T - 1]  # the last token is never read
    decoded = torch.arange(T - 1)[None, :] >= (prompt_lengths[:, None] - 1)
    assert int(decoded.sum()) == sum(T - n for n in prompt_lengths.tolist())
    assert bool(torch.isfinite(cached[decoded]).all())
    torch.testing.assert_close(cached[decoded], full[decoded], **F32)


@torch.no_grad()
def test_gpt_log_probs_agree_with_the_cpu(device):
    """Whole-sequence scoring (score_token_lists, lists of different lengths) and a prefill plus decode steps."""
    cpu = random_gpt(seed=2)
    model = on(cpu, device)
    rng = random.Random(0)
    lists = [[rng.randrange(V) for _ in range(n)] for n in (2, 7, 30, 48)]
    expected, got = score_token_lists(cpu, lists), score_token_lists(model, lists)
    assert [len(x) for x in got] == [n - 1 for n in (2, 7, 30, 48)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, **F32)

    def steps(m: GPT) -> torch.Tensor:
        where = device_of(m)
        cache = m.allocate(slots=2, max_len=16)
        prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]], device=where)
        out = [m.prefill(cache, torch.tensor([0, 1], device=where), prompt, torch.tensor([4, 2], device=where))]
        for t in (11, 12, 13):
            out.append(m.decode(cache, torch.tensor([0, 1], device=where), torch.tensor([t, t + 1], device=where)))
        return torch.log_softmax(torch.stack(out).float(), -1).cpu()

    torch.testing.assert_close(steps(model), steps(cpu), **F32)


# ---- 2. the decoding engine: greedy, seeded sampling, beams, continuous batching ---------------------------------



@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer([TEXT])


@pytest.fixture(scope="module")
def trained_lm(tokenizer) -> GPT:
    """As tests/service/test_decoding.py: a tiny GPT fitted for a moment to a shuffled text (on the CPU), so greedy
    output varies and sampling has real choices."""
    return fit_tiny_gpt(tokenizer, TEXT)


def scored(model: GPT, prompt: list[int], generated: list[int]) -> list[float]:
    """log p(each generated token | what precedes it) by a full forward on the model's device."""
    ids = torch.tensor([prompt + generated], device=device_of(model))
    with torch.no_grad():
        return sequence_log_probs(model, ids)[0, len(prompt) - 1:].tolist()


def test_greedy_generation_is_the_same_on_every_device(device, trained_lm, tokenizer):
    prompt = tokenizer.encode("abc d")
    params = GenerationParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    expected = generate(trained_lm, tokenizer, prompt, params)[0]
    model = on(trained_lm, device)
    out = generate(model, tokenizer, prompt, params)[0]
    # The premise of comparing argmaxes across devices: no near-tie anywhere on the greedy path.
    with torch.no_grad():
        logits = trained_lm.logits(torch.tensor([prompt + expected.token_ids[:-1]]))[0, len(prompt) - 1:]
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3
    assert out.token_ids == expected.token_ids and len(out.token_ids) == 16
    assert out.finish_reason == "length" and out.text == tokenizer.decode(out.token_ids)
    np.testing.assert_allclose(out.logprobs, expected.logprobs, **F32)
    np.testing.assert_allclose(out.logprobs, scored(model, prompt, out.token_ids), **F32)


def test_seeded_sampling_is_the_same_on_every_device(device, trained_lm, tokenizer):
    """The engine draws samples on the CPU with the request's generator: the same seed gives the same text on any
    device (barring a uniform draw within float error of a cumulative probability)."""
    prompt = tokenizer.encode("hij")
    params = GenerationParams(max_new_tokens=12, temperature=0.9, top_k=5, top_p=0.95, seed=3, n=2, ignore_eos=True)
    expected = generate(trained_lm, tokenizer, prompt, params)
    model = on(trained_lm, device)
    out = generate(model, tokenizer, prompt, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in expected]
    assert len({tuple(o.token_ids) for o in out}) == 2
    for o, e in zip(out, expected, strict=True):
        np.testing.assert_allclose(o.logprobs, e.logprobs, **F32)


def test_beam_search_on_the_device(device, trained_lm, tokenizer):
    """num_return_sequences beams, best first, each beam's log-probs the model's own scores of it, its score
    their length-normalised sum; the same beams as on the CPU."""
    prompt = tokenizer.encode("l")
    params = GenerationParams(max_new_tokens=8, num_beams=4, num_return_sequences=3, ignore_eos=True)
    model = on(trained_lm, device)
    out = generate(model, tokenizer, prompt, params)
    assert [o.index for o in out] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out}) == 3
    for o in out:
        assert len(o.token_ids) == len(o.logprobs) == 8 and o.finish_reason == "length"
        np.testing.assert_allclose(o.logprobs, scored(model, prompt, o.token_ids), **F32)
        assert o.score == pytest.approx(sum(o.logprobs) / 8 ** params.length_penalty, abs=1e-6)
    scores = [o.score for o in out]
    assert scores == sorted(scores, reverse=True)
    expected = generate(trained_lm, tokenizer, prompt, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in expected]
    np.testing.assert_allclose(scores, [o.score for o in expected], **F32)


def test_continuous_batching_on_the_device_matches_requests_alone_on_the_cpu(device, trained_lm, tokenizer):
    """Requests of different prompt lengths joining a running batch on the device (scattered slots, masked decode
    steps, forks and beam reorders of the cache) give what each gives alone on the CPU."""
    specs = [
        ("abc", GenerationParams(max_new_tokens=15, temperature=0, ignore_eos=True)),
        ("hij k", GenerationParams(max_new_tokens=9, temperature=0.9, top_k=5, seed=3, n=2, ignore_eos=True)),
        ("l", GenerationParams(max_new_tokens=7, num_beams=3, num_return_sequences=2, ignore_eos=True)),
        ("mnop a", GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.8, seed=4, ignore_eos=True)),
    ]
    alone = [[o.token_ids for o in generate(trained_lm, tokenizer, tokenizer.encode(p), s)] for p, s in specs]
    engine = Engine(on(trained_lm, device), tokenizer, slots=12, max_len=64)
    assert engine.device.type == device
    first = [engine.submit(tokenizer.encode(p), s) for p, s in specs[:2]]
    for _ in range(4):
        engine.step()
    requests = first + [engine.submit(tokenizer.encode(p), s) for p, s in specs[2:]]
    while any(not r.finished for r in requests):
        engine.step()
    assert all(r.error is None for r in requests)
    assert [[o.token_ids for o in r.outputs] for r in requests] == alone
    assert not engine.has_work and len(engine.free) == 12


# ---- 3. image models: log-probs against the CPU, seeded sampling ---------------------------------------------------

H, W = 4, 4
IMAGE_CONFIGS = {  # tiny architectures; a kind added to IMAGE_MODELS without one here fails with a KeyError
    "pixelcnn": dict(channels=8, n_layers=2, kernel_size=3, head_channels=8),
    "made": dict(hidden=(16, 16), n_masks=2),
    "nade": dict(hidden=8),
    "fvsbn": {},
}
IMAGE_CASES = [(2, 0), (3, 2)]  # (levels, n_classes): Bernoulli unconditional; softmax, class-conditional


def image_model(kind: str, levels: int, n_classes: int) -> ImageModel:
    """A float32 model (as built for serving) with every parameter drawn N(0, 0.5^2): no zero init hides a
    dependence, and the conditionals are far from uniform; a non-uniform class prior."""
    model = build_image_model(kind, dict(height=H, width=W, levels=levels, n_classes=n_classes, **IMAGE_CONFIGS[kind]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    if n_classes:
        model.set_class_prior(torch.arange(n_classes).repeat_interleave(torch.arange(1, n_classes + 1)))
    return model.eval()


@pytest.mark.parametrize(("levels", "n_classes"), IMAGE_CASES)
@pytest.mark.parametrize("kind", sorted(IMAGE_MODELS))
def test_image_log_probs_agree_with_the_cpu(device, kind, levels, n_classes):
    cpu = image_model(kind, levels, n_classes)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, levels, (6, H, W), generator=g)
    labels = torch.arange(6) % n_classes if n_classes else None
    with torch.no_grad():
        expected_lp, expected_px = cpu.score(x, labels)
        expected_marginal = cpu.log_prob(x)  # marginalised over the labels when conditional
    assert bool(torch.isfinite(expected_lp).all()) and float(expected_lp.std()) > 0.1  # not a trivial model

    model = on(cpu, device)
    x_dev = x.to(device)
    labels_dev = None if labels is None else labels.to(device)
    with torch.no_grad(), full_fp32():
        lp, px = model.score(x_dev, labels_dev)
        marginal = model.log_prob(x_dev)
    assert lp.device.type == device and px.shape == (6, H, W)
    torch.testing.assert_close(lp.cpu(), expected_lp, **F32)
    torch.testing.assert_close(px.cpu(), expected_px, **F32)
    torch.testing.assert_close(marginal.cpu(), expected_marginal, **F32)

    # The serving runtime's torch path (service/image_runtime.py) on the device.
    runtime = TorchImageRuntime(model)
    assert runtime.device == device
    with full_fp32():
        rt_lp, rt_px = runtime.score(x.numpy(), None if labels is None else labels.numpy())
    np.testing.assert_allclose(rt_lp, expected_lp.double().numpy(), **F32)
    np.testing.assert_allclose(rt_px, expected_px.double().numpy(), **F32)

    # The default math serving runs (TF32 convolutions on recent GPUs): close, more loosely.
    with torch.no_grad():
        default_lp = model.log_prob(x_dev, labels_dev)
    torch.testing.assert_close(default_lp.cpu(), expected_lp, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize(("levels", "n_classes"), IMAGE_CASES)
@pytest.mark.parametrize("kind", sorted(IMAGE_MODELS))
def test_seeded_image_sampling_on_the_device(device, kind, levels, n_classes):
    """As service/image.py draws: a generator on the module's device, under inference mode. The same seed gives the
    same images (and drawn labels) twice; completions keep their known pixels; samples score finitely."""
    model = on(image_model(kind, levels, n_classes), device)
    n, known = 5, 6
    with torch.inference_mode():
        a, ya = model.sample(n=n, generator=make_generator(device, 11))
        b, yb = model.sample(n=n, generator=make_generator(device, 11))
        assert a.shape == (n, H, W) and a.dtype == torch.long and a.device.type == device
        assert torch.equal(a, b)
        assert int(a.min()) >= 0 and int(a.max()) < levels
        if n_classes:
            assert ya.shape == (n,) and torch.equal(ya, yb) and ya.device.type == device
            assert int(ya.min()) >= 0 and int(ya.max()) < n_classes
        else:
            assert ya is None and yb is None
        given = torch.arange(n, device=device) % n_classes if n_classes else None
        c, yc = model.sample(labels=given, prefix=a, known=known, generator=make_generator(device, 12))
        d, _ = model.sample(labels=given, prefix=a, known=known, generator=make_generator(device, 12))
        assert torch.equal(c, d) and c.shape == (n, H, W)
        assert torch.equal(c.view(n, -1)[:, :known], a.view(n, -1)[:, :known])
        if n_classes:
            assert torch.equal(yc, given)
        lp = model.log_prob(torch.cat([a, c]), None if not n_classes else torch.cat([ya, yc]))
    assert lp.shape == (2 * n,) and bool(torch.isfinite(lp).all()) and bool((lp <= 1e-5).all())


# ---- 4. Gaussian mixtures: scoring on the device, EM on the device -------------------------------------------------


def blobs() -> torch.Tensor:
    """300 raw 2-D records from three elongated clusters, float64."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 2.0], [-3.0, 8.0]], dtype=torch.float64)
    noise = torch.randn(300, 2, generator=g, dtype=torch.float64) * torch.tensor([1.5, 0.5], dtype=torch.float64)
    return centres.repeat_interleave(100, dim=0) + noise @ torch.tensor([[1.0, 0.3], [0.0, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_mixture_scores_agree_with_the_cpu(device, covariance):
    """A mixture fitted on the CPU (with its standardisation), scored by the serving runtime's torch path
    (service/records_runtime.py: a copy of the module on the device) and directly."""
    x = blobs()
    mean, scale = x.mean(0), x.std(0)
    result = fit_gmm((x - mean) / scale, 3, EMSettings(covariance_type=covariance, n_init=1, max_iter=30))
    cpu: GaussianMixture = result.model.eval()
    cpu.set_standardisation(mean, scale)
    probe = torch.cat([x[::7], x[:5] * 3.0])  # in and well outside the data
    with torch.no_grad():
        expected_lp, expected_resp = cpu(probe)
    runtime = TorchRecordsRuntime(cpu, device)
    assert device_of(runtime.model) == device and device_of(cpu) == "cpu"
    lp, resp = runtime.log_prob(probe.numpy())
    np.testing.assert_allclose(lp, expected_lp.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(resp, expected_resp.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(resp.sum(1), 1.0, atol=1e-9)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_on_the_device_follows_the_cpu(device, covariance):
    """EM takes no device argument; it runs where its model and data are. From the same k-means++ start, five
    iterations on the device give the CPU's log-likelihoods (float64), never decreasing the objective."""
    x = blobs()
    z = (x - x.mean(0)) / x.std(0)
    settings = EMSettings(covariance_type=covariance, max_iter=5, tol=0.0)
    start = initial_model(z, 3, settings, torch.Generator().manual_seed(0))
    expected = run_em(copy.deepcopy(start), z, settings)
    got = run_em(copy.deepcopy(start).to(device), z.to(device), settings)
    assert device_of(got.model) == device
    assert got.n_iter == expected.n_iter and got.n_iter >= 3
    np.testing.assert_allclose([h.log_likelihood for h in got.history],
                               [h.log_likelihood for h in expected.history], rtol=1e-6)
    objectives = [h.objective for h in got.history]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(objectives))
    assert all(abs(h.kl_gap) < 1e-9 for h in got.history)
    np.testing.assert_allclose(got.model.means.cpu().numpy(), expected.model.means.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.model.log_weights.cpu().numpy(), expected.model.log_weights.numpy(),
                               rtol=1e-6, atol=1e-9)


# ---- 5. tiny end-to-end training runs on the device, loaded by the in-process runtimes -----------------------------


def finite_numbers(value: object) -> list[float]:
    """Every number in a (nested) metrics value; asserts each is finite."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in finite_numbers(v)]
    if isinstance(value, bool | str) or value is None:
        return []
    assert isinstance(value, int | float), value
    assert math.isfinite(value), value
    return [float(value)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    subjects, verbs, objects = ["the cat", "a dog", "my lord"], ["sees", "loves", "finds"], ["the moon", "a rose"]
    text = "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n" for _ in range(300))
    path = tmp_path_factory.mktemp("corpus") / "grammar.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_text_training_on_the_device(device, corpus, tmp_path):
    """Six iterations of the tiny GPT preset on the device into a store; the artifact loads, its metrics are
    finite, and the in-process text runtime on the device scores and decodes as on the CPU."""
    cfg = TextTrainConfig(name="tiny-gpt", dataset=str(corpus), preset="tiny", model="gpt", max_iters=6,
                          eval_interval=3, eval_iters=1, checkpoint_interval=3, export_onnx=False, device=device)
    path = train_text(cfg, tmp_path, progress=False)
    manifest = load_artifact(path).manifest
    assert manifest.kind == "gpt" and manifest.training["device"] == device
    metrics = manifest.metrics
    assert len(finite_numbers(metrics)) >= 8
    assert metrics["iterations"] == 6
    vocab = manifest.input.vocab_size
    assert 0 < metrics["validation_nll_nats_per_token"] < math.log(vocab)  # better than uniform already

    here, cpu = load_text_model(path, runtime="torch", device=device), load_text_model(path, "torch", "cpu")
    assert here.device == device and device_of(here.scorer) == device
    ids = [manifest.input.bos_token_id, *here.tokenizer.encode("the cat sees a rose.\n")]
    (got,), (expected,) = score_token_lists(here.scorer, [ids]), score_token_lists(cpu.scorer, [ids])
    assert len(got) == len(ids) - 1 and all(math.isfinite(v) for v in got)
    np.testing.assert_allclose(got, expected, **F32)
    prompt = ids[:4]
    out = generate(here.model, here.tokenizer, prompt, GenerationParams(max_new_tokens=10, temperature=0,
                                                                       ignore_eos=True))[0]
    assert len(out.token_ids) == 10
    np.testing.assert_allclose(out.logprobs, scored(here.scorer, prompt, out.token_ids), **F32)


def test_image_training_on_the_device(device, tmp_path):
    """One epoch of a class-conditional FVSBN (tiny preset) on the digits on the device; the artifact's test NLL,
    measured on the device, is what the CPU computes from its weights, and the image runtime on the device scores as
    the one on the CPU."""
    cfg = ImageTrainConfig(model="fvsbn", dataset="digits", name="digits", conditional=True, preset="tiny", epochs=1,
                           threads=1, grid_size=2, sample_every=0, export_onnx=False, device=device)
    path = train_image(cfg, tmp_path, progress=False)
    manifest = load_artifact(path).manifest
    assert manifest.kind == "fvsbn" and manifest.training["device"] == device
    metrics = manifest.metrics
    assert len(finite_numbers(metrics)) >= 8
    assert 0 < metrics["test_nll_nats"] < 64 * math.log(17)  # better than uniform over 17 levels

    here, cpu = load_image_model(path, runtime="torch", device=device), load_image_model(path, "torch", "cpu")
    assert here.device == device and here.runtime.name == "torch" and device_of(here.module) == device
    test = load_digits().test
    lp_cpu, _ = cpu.runtime.score(test.images, None)
    assert -lp_cpu.mean() == pytest.approx(metrics["test_nll_nats"], rel=1e-4)
    images, labels = test.images[:32], test.labels[:32]
    for given in (labels, None):
        with full_fp32():
            lp, px = here.runtime.score(images, given)
        expected_lp, expected_px = cpu.runtime.score(images, given)
        np.testing.assert_allclose(lp, expected_lp, rtol=1e-4, atol=1e-3)  # sums of 64 pixels
        np.testing.assert_allclose(px, expected_px, **F32)
