"""The transformer on ONNX Runtime (service/onnx_text.py) against the torch GPT it was exported from: the same
logits at prefill and at every decode step (prompts of different lengths in scattered slots, slot copies, subsets
of slots), the same greedy and beam-search tokens, and the runtime choice of `load_text_model`.

One export for the whole module (the dynamo exporter takes seconds): a tiny random Hugging Face GPT-2 imported
with its ONNX graphs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from genserve.artifacts import artifact as art
from genserve.artifacts.tokenizer import train_bpe_tokenizer
from genserve.models.gpt import GPTConfig
from genserve.service.decoding import GenerationParams, generate
from genserve.service.onnx_text import OnnxGPT
from genserve.service.text_runtime import LoadedTextModel, load_text_model
from genserve.training.hf_import import import_hf_gpt2

transformers = pytest.importorskip("transformers")

V = 300


def save_hf_gpt2(directory: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0, initializer_range=0.3)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory, safe_serialization=True)
    rng = random.Random(0)
    words = ["".join(rng.choice(["ka", "lo", "mi", "ren", "tas", "vu", "po", "shi"]) for _ in range(rng.randint(1, 3)))
             for _ in range(150)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    tokenizer = train_bpe_tokenizer(texts, V)
    assert tokenizer.vocab_size == V
    (directory / "tokenizer.json").write_text(tokenizer.to_json())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: one thread is faster, and much faster on a busy machine than threads that wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf-gpt2")
    save_hf_gpt2(directory)
    return directory


@pytest.fixture(scope="module")
def artifact_path(hf_dir, tmp_path_factory) -> Path:
    return import_hf_gpt2(hf_dir, "tiny-gpt2", tmp_path_factory.mktemp("store"), export_onnx=True)


@pytest.fixture(scope="module")
def onnx_loaded(artifact_path) -> LoadedTextModel:
    return load_text_model(artifact_path, "onnx", "cpu")


@pytest.fixture(scope="module")
def models(onnx_loaded) -> tuple[OnnxGPT, torch.nn.Module]:
    assert isinstance(onnx_loaded.model, OnnxGPT)
    return onnx_loaded.model, onnx_loaded.scorer


def test_artifact_holds_checked_graphs_with_dynamic_shapes(artifact_path):
    import onnx

    loaded = art.load_artifact(artifact_path)
    assert loaded.manifest.metrics["onnx_max_rel_error"] < 1e-4

    def io(graph: bytes) -> tuple[dict, dict]:
        g = onnx.load_from_string(graph).graph
        shape = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.input,
                                                                                                       *g.output]}
        return {v.name: shape[v.name] for v in g.input}, {v.name: shape[v.name] for v in g.output}

    inputs, outputs = io(loaded.contents[art.ONNX_PREFILL])
    assert inputs == {"tokens": ["batch", "length"]}
    assert outputs == {"logits": ["batch", "length", V], "keys": [2, "batch", 2, "length", 16],
                       "values": [2, "batch", 2, "length", 16]}
    inputs, outputs = io(loaded.contents[art.ONNX_DECODE])
    cache = [2, "batch", 2, "past", 16]
    assert inputs == {"tokens": ["batch"], "positions": ["batch"], "past_keys": cache, "past_values": cache,
                      "past_mask": ["batch", "past"]}
    assert outputs == {"logits": ["batch", V], "new_keys": [2, "batch", 2, 1, 16],
                       "new_values": [2, "batch", 2, 1, 16]}


@torch.no_grad()
def test_logits_match_torch(models):
    onnx_model, torch_model = models
    tokens = torch.randint(0, V, (3, 64), generator=torch.Generator().manual_seed(0))
    got = onnx_model.logits(tokens)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, torch_model.logits(tokens), atol=1e-4, rtol=0)


@torch.no_grad()
def test_prefill_and_decode_match_torch_at_every_step(models):
    """Prompts of lengths 5, 1 (a past of one position at the first decode) and 9, right-padded, in scattered
    slots of both models; 20 decode steps, with a fork (copy_slots) after step 5 and steps on subsets of slots.
    At every step the ONNX logits equal the torch GPT's (and, at some steps, those of the whole prefix recomputed)."""
    onnx_model, torch_model = models
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 1, 9])
    tokens = torch.randint(0, V, (3, 9), generator=g)
    slots = torch.tensor([4, 0, 2])
    states = onnx_model.allocate(6, 40), torch_model.allocate(6, 40)
    got, want = (m.prefill(s, slots, tokens, lengths) for m, s in zip(models, states, strict=True))
    seqs = {int(s): tokens[i, : lengths[i]].tolist() for i, s in enumerate(slots)}
    live = slots
    for step in range(21):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=f"step {step}")
        for row, slot in enumerate(live.tolist() if step in (0, 1, 6, 20) else []):
            full = torch_model.logits(torch.tensor([seqs[slot]]))[0, -1]
            torch.testing.assert_close(got[row], full, atol=1e-4, rtol=0, msg=f"step {step} slot {slot}")
        if step == 20:
            break
        if step == 5:  # fork slot 0 into 1 and 5, and slot 2 into 3, as beams and samples do
            src, dst = torch.tensor([0, 0, 2]), torch.tensor([1, 5, 3])
            for m, s in zip(models, states, strict=True):
                m.copy_slots(s, src, dst)
            for a, b in zip(src.tolist(), dst.tolist(), strict=True):
                seqs[b] = list(seqs[a])
        live = torch.tensor(sorted(seqs)) if step >= 5 else slots
        if step % 3 == 2:  # a step over some of the slots only
            live = live[::2]
        nxt = torch.randint(0, V, (len(live),), generator=g)
        for slot, t in zip(live.tolist(), nxt.tolist(), strict=True):
            seqs[slot].append(t)
        got, want = (m.decode(s, live, nxt) for m, s in zip(models, states, strict=True))
    assert states[0].lengths.tolist() == states[1].lengths.tolist()
    for slot, seq in seqs.items():
        assert states[0].lengths[slot] == len(seq)
        n = len(seq)
        np.testing.assert_allclose(states[0].k[:, slot, :, :n], states[1].k[:, slot, :, :n].numpy(), atol=1e-5)
        np.testing.assert_allclose(states[0].v[:, slot, :, :n], states[1].v[:, slot, :, :n].numpy(), atol=1e-5)


@torch.no_grad()
def test_beam_reorder_with_overlapping_copies(models):
    """copy_slots with repeated sources and overlapping src/dst (a beam-search reorder) is a permutation read
    before any write, as in the torch cache."""
    onnx_model, torch_model = models
    states = onnx_model.allocate(4, 16), torch_model.allocate(4, 16)
    tokens = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(2))
    for m, s in zip(models, states, strict=True):
        m.prefill(s, torch.arange(4), tokens, torch.tensor([6, 3, 5, 2]))
        m.copy_slots(s, torch.tensor([1, 0, 0, 3]), torch.arange(4))
    got, want = (m.decode(s, torch.arange(4), torch.tensor([1, 2, 3, 4])) for m, s in zip(models, states, strict=True))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert states[0].lengths.tolist() == [4, 7, 7, 3]


def test_limits(models):
    onnx_model, _ = models
    with pytest.raises(ValueError, match="exceeds the context length"):
        onnx_model.allocate(1, 65)
    state = onnx_model.allocate(1, 4)
    with pytest.raises(ValueError, match="does not fit"):
        onnx_model.prefill(state, torch.tensor([0]), torch.zeros(1, 5, dtype=torch.long), torch.tensor([5]))
    onnx_model.prefill(state, torch.tensor([0]), torch.zeros(1, 4, dtype=torch.long), torch.tensor([4]))
    with pytest.raises(ValueError, match="reached the cache"):
        onnx_model.decode(state, torch.tensor([0]), torch.tensor([1]))


def test_generation_through_onnx_matches_torch(onnx_loaded):
    onnx_model, torch_model, tokenizer = onnx_loaded.model, onnx_loaded.scorer, onnx_loaded.tokenizer
    for prompt, params in (([5, 17, 42], GenerationParams(max_new_tokens=24, temperature=0.0)),
                           ([77], GenerationParams(max_new_tokens=24, temperature=0.0)),
                           ([250, 3, 3, 9, 100, 7, 61], GenerationParams(max_new_tokens=12, num_beams=3,
                                                                         num_return_sequences=2))):
            got = generate(onnx_model, tokenizer, prompt, params)
            want = generate(torch_model, tokenizer, prompt, params)
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
            np.testing.assert_allclose([o.cumulative_logprob for o in got], [o.cumulative_logprob for o in want],
                                       atol=1e-3)


def test_runtime_choice(artifact_path, hf_dir, tmp_path):
    # auto is torch for text: its KV-cache decode is ~2x faster than ONNX Runtime's here (README).
    assert load_text_model(artifact_path, "auto", "cpu").runtime_name == "torch"
    onnx = load_text_model(artifact_path, "onnx", "cpu")
    assert onnx.runtime_name == "onnx" and isinstance(onnx.model, OnnxGPT) and onnx.device == "cpu"
    plain = import_hf_gpt2(hf_dir, "plain", tmp_path, export_onnx=False)
    assert load_text_model(plain, "auto", "cpu").runtime_name == "torch"
    with pytest.raises(art.ArtifactError, match=r"no prefill\.onnx"):
        load_text_model(plain, "onnx", "cpu")


def test_cuda_request_falls_back_to_what_onnxruntime_has(artifact_path):
    import onnxruntime as ort

    loaded = art.load_artifact(artifact_path)
    model = OnnxGPT(loaded.contents[art.ONNX_PREFILL], loaded.contents[art.ONNX_DECODE],
                    GPTConfig(**loaded.manifest.config), "cuda")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert model.device == ("cuda" if has_cuda else "cpu")
    out = model.logits(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, V) and out.device.type == "cpu"
