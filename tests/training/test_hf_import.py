"""Importing a Hugging Face GPT-2 directory: the same logits, the same greedy tokens and the same beams and beam
scores as transformers' own `generate()`, on a tiny random model saved with `save_pretrained` (nothing is
downloaded). Also: the refusals, and `genserve import hf`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from genserve.artifacts import artifact as art
from genserve.artifacts.tokenizer import TextTokenizer, train_bpe_tokenizer
from genserve.service.cli import app
from genserve.service.decoding import GenerationParams, generate
from genserve.service.text_runtime import LoadedTextModel, load_text_model
from genserve.training.hf_import import import_hf_gpt2

transformers = pytest.importorskip("transformers")

V = 300
MAX_NEW = 20
PROMPTS = [[5, 17, 42], [250, 3, 3, 9, 100, 7, 61], [77]]


def synthetic_texts(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vu", "po", "shi", "ne", "dor", "ya", "bel"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    return [" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(n)]


def save_hf_gpt2(directory: Path, seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
    """A random GPT-2 saved as transformers saves it, plus a byte-level BPE tokenizer.json of the same vocabulary.
    A large initializer_range makes the next-token distributions peaked, so beams are far from ties."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                    initializer_range=0.3)
    settings.update(overrides)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer = train_bpe_tokenizer(synthetic_texts(), V)
    assert tokenizer.vocab_size == V
    (directory / "tokenizer.json").write_text(tokenizer.to_json())
    return model


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
def hf_model(hf_dir) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory) -> LoadedTextModel:
    path = import_hf_gpt2(hf_dir, "tiny-gpt2", tmp_path_factory.mktemp("store"), export_onnx=False)
    return load_text_model(path, "torch", "cpu")


def with_eos(tokenizer: TextTokenizer, eos: int | None) -> TextTokenizer:
    return TextTokenizer.from_json(tokenizer.to_json(), "bpe", tokenizer.bos_token_id, eos)


def hf_generate(model, prompt: list[int], eos: int, **kwargs):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                              eos_token_id=eos, pad_token_id=eos, **kwargs)


def new_tokens(sequence: torch.Tensor, prompt_len: int, eos: int) -> list[int]:
    """The generated part of one of HF's rows, without the padding after EOS."""
    out = sequence[prompt_len:].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def early_eos(model, prompt: list[int]) -> int:
    """A token the model really generates: greedy's third token, so EOS ends hypotheses early."""
    return int(hf_generate(model, prompt, eos=V - 1, min_new_tokens=3)[0, len(prompt) + 2])


def never_eos(model, prompts: list[list[int]]) -> int:
    """The token least likely anywhere along the prompts: beam search never reaches it (checked against HF)."""
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([p])).logits[0] for p in prompts])
    return int(logits.max(dim=0).values.argmin())


def test_manifest(imported, hf_dir):
    m = imported.artifact.manifest
    assert m.kind == "gpt" and m.name == "tiny-gpt2"
    assert m.config == {"vocab_size": V, "context_length": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                        "dropout": 0.0, "bias": True, "activation": "gelu_tanh", "layer_norm_eps": 1e-5}
    assert m.input.tokenizer == "bpe" and m.input.vocab_size == V and m.input.context_length == 64
    assert m.input.bos_token_id == 0 and m.input.eos_token_id == 0
    assert m.training["source"] == "huggingface" and m.training["config"]["model_type"] == "gpt2"
    assert m.training["directory"] == str(hf_dir.resolve())
    assert m.metrics["parameters"] == imported.scorer.num_parameters()
    assert art.ONNX_PREFILL not in m.files and imported.runtime_name == "torch"
    assert imported.tokenizer.vocab_size == V


@torch.no_grad()
def test_logits_match_transformers(imported, hf_model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (3, 64), generator=g)
    torch.testing.assert_close(imported.model.logits(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)


def test_greedy_matches_transformers(imported, hf_model):
    eos_hits = 0
    for prompt in PROMPTS:
        for eos in (early_eos(hf_model, prompt), never_eos(hf_model, PROMPTS)):
            want = new_tokens(hf_generate(hf_model, prompt, eos)[0], len(prompt), eos)
            params = GenerationParams(max_new_tokens=MAX_NEW, temperature=0.0)
            (out,) = generate(imported.model, with_eos(imported.tokenizer, eos), prompt, params)
            assert out.token_ids == want, (prompt, eos)
            assert out.finish_reason == ("stop" if eos in want else "length")
            eos_hits += eos in want
    assert eos_hits >= len(PROMPTS)  # the early EOS really ended greedy decoding


@pytest.mark.parametrize("early_stopping", [False, True])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_matches_transformers(imported, hf_model, num_return_sequences, length_penalty, early_stopping):
    finished_by_eos = 0
    for prompt in PROMPTS[:2]:
        for eos, eos_expected in ((early_eos(hf_model, prompt), True), (never_eos(hf_model, PROMPTS), False)):
            hf = hf_generate(hf_model, prompt, eos, num_beams=4, num_return_sequences=num_return_sequences,
                             length_penalty=length_penalty, early_stopping=early_stopping, output_scores=True,
                             return_dict_in_generate=True)
            want = [new_tokens(s, len(prompt), eos) for s in hf.sequences]
            params = GenerationParams(max_new_tokens=MAX_NEW, num_beams=4, num_return_sequences=num_return_sequences,
                                      length_penalty=length_penalty, early_stopping=early_stopping)
            outs = generate(imported.model, with_eos(imported.tokenizer, eos), prompt, params)
            case = (prompt, eos, num_return_sequences, length_penalty, early_stopping)
            assert [o.token_ids for o in outs] == want, case
            torch.testing.assert_close(torch.tensor([o.score for o in outs]), hf.sequences_scores.float(),
                                       atol=1e-4, rtol=0, msg=str(case))
            ended = sum(eos in w for w in want)
            if not eos_expected:
                assert ended == 0, case  # this case is about hypotheses that end at the length limit
            finished_by_eos += ended
    if length_penalty <= 1.0:  # (a length penalty of 2 favours the long hypotheses that ran to the limit)
        assert finished_by_eos > 0  # hypotheses that EOS finished were among those returned


def test_never_early_stopping_matches_transformers(imported, hf_model):
    prompt = PROMPTS[1]
    eos = early_eos(hf_model, prompt)
    for length_penalty in (1.0, -1.0):
        hf = hf_generate(hf_model, prompt, eos, num_beams=3, num_return_sequences=3, length_penalty=length_penalty,
                         early_stopping="never", output_scores=True, return_dict_in_generate=True)
        params = GenerationParams(max_new_tokens=MAX_NEW, num_beams=3, num_return_sequences=3,
                                  length_penalty=length_penalty, early_stopping="never")
        outs = generate(imported.model, with_eos(imported.tokenizer, eos), prompt, params)
        assert [o.token_ids for o in outs] == [new_tokens(s, len(prompt), eos) for s in hf.sequences]
        torch.testing.assert_close(torch.tensor([o.score for o in outs]), hf.sequences_scores.float(),
                                   atol=1e-4, rtol=0)


# ---- variants of the directory --------------------------------------------------------------------------------


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@torch.no_grad()
def test_unprefixed_keys_with_lm_head_and_exact_gelu(tmp_path, imported):
    """A GPT2Model-style file (no "transformer." prefix) with an explicit lm_head.weight and the causal-mask
    buffers, and activation "gelu" (exact) instead of "gelu_new"."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "hf"
    save_hf_gpt2(directory, seed=1, activation_function="gelu")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(directory / "model.safetensors").items()}
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, directory / "model.safetensors")
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    loaded = load_text_model(import_hf_gpt2(directory, "plain", tmp_path / "store", export_onnx=False), "torch")
    assert loaded.artifact.manifest.config["activation"] == "gelu"
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.model.logits(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"n_inner": 100}, "n_inner 100 is not supported"),
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True is not supported"),
        ({"add_cross_attention": True}, "add_cross_attention=True is not supported"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False is not supported"),
        ({"eos_token_id": 50256}, "eos_token_id 50256 is not a token id"),
        ({"n_embd": 48}, "config.json needs ("),
        ({"tie_word_embeddings": False}, "untied output embeddings are not supported"),
    ],
)
def test_config_refusals_name_the_file(tmp_path, hf_dir, change, message):
    directory = copy_dir(hf_dir, tmp_path / "hf")
    edit_config(directory, **change)
    with pytest.raises(ValueError, match=r"config\.json|model\.safetensors") as info:
        import_hf_gpt2(directory, "x", tmp_path / "store", export_onnx=False)
    assert message in str(info.value)
    assert not (tmp_path / "store" / "x").exists() or not art.versions(tmp_path / "store", "x")


def test_missing_and_unsafe_files(tmp_path, hf_dir):
    store = tmp_path / "store"
    directory = copy_dir(hf_dir, tmp_path / "no-config")
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        import_hf_gpt2(directory, "x", store)

    directory = copy_dir(hf_dir, tmp_path / "pickled")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: .*safetensors is required"):
        import_hf_gpt2(directory, "x", store)

    directory = copy_dir(hf_dir, tmp_path / "no-tokenizer")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing"):
        import_hf_gpt2(directory, "x", store)

    directory = copy_dir(hf_dir, tmp_path / "broken")
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        import_hf_gpt2(directory, "x", store)

    directory = copy_dir(hf_dir, tmp_path / "bad-json")
    (directory / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        import_hf_gpt2(directory, "x", store)

    with pytest.raises(FileNotFoundError, match="not a directory"):
        import_hf_gpt2(tmp_path / "nowhere", "x", store)
    assert art.list_models(store) == {}


def test_cli_import_hf(tmp_path, hf_dir):
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(app, ["import", "hf", str(hf_dir), "--name", "tiny", "--store", str(store), "--no-onnx"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "parameters" in result.output
    assert art.versions(store, "tiny") == ["1"]

    broken = copy_dir(hf_dir, tmp_path / "llama")
    edit_config(broken, model_type="llama")
    result = runner.invoke(app, ["import", "hf", str(broken), "--name", "tiny", "--store", str(store)])
    assert result.exit_code == 2 and "model_type 'llama' is not supported" in result.output
    result = runner.invoke(app, ["import", "hf", str(tmp_path / "nowhere"), "--name", "tiny", "--store", str(store)])
    assert result.exit_code == 2 and "not a directory" in result.output
    result = runner.invoke(app, ["import", "hf", str(hf_dir), "--name", "Bad Name", "--store", str(store)])
    assert result.exit_code == 2 and "invalid model name" in result.output
    assert art.versions(store, "tiny") == ["1"]


def test_config_without_eos(tmp_path, hf_dir):
    directory = copy_dir(hf_dir, tmp_path / "hf")
    edit_config(directory, eos_token_id=None)
    loaded = load_text_model(import_hf_gpt2(directory, "no-eos", tmp_path / "store", export_onnx=False), "torch")
    assert loaded.spec.eos_token_id is None and loaded.tokenizer.eos_token_id is None
    (out,) = generate(loaded.model, loaded.tokenizer, [1, 2], GenerationParams(max_new_tokens=5, temperature=0.0))
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
